"""Evidence stores behind one small protocol (`base.Store`)."""
