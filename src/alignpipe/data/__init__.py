"""Data checks: the Great Expectations validators of corpus, prompt and preference files (`validators`)."""
