"""lm-evaluation-harness runner and local tasks for OpenAI-compatible completions servers."""
