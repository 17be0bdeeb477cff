"""Evaluation: window scoring, score-first test-time training, receipts."""
