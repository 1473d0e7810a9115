"""Where cameras come from: each source turns its world into Docked/Undocked events."""
