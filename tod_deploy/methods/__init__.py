"""One module per paper: its training form, its deploy() view and its checkpoint key mapping."""
