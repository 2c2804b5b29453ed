"""LaCLIP-style caption rewriting: prompt pools, LLM and rule-based rewriters, quality guards, resumable output."""
