"""Detection heads (RPN, RoI heads, dense heads) with mmdet key names."""
