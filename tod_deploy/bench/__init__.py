"""Speed: timing loops over runners, statistics, and reports (table, JSON)."""
