"""`tandem bench`: load generation against any OpenAI-compatible endpoint, and reports."""
