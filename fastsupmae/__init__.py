"""fastsupmae."""
