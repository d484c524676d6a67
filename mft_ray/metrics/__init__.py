"""Scores of a society's debate: accuracy (Algorithm 2) and diversity (Section 4.2)."""
