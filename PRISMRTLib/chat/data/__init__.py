"""Data the chat reads: the paraphrase classifier's training questions and the evaluation's wordings."""
