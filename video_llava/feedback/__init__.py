"""AI feedback (LLaVA-Hound): sample answers, judge them against a detailed caption, pick preference pairs; and
the evaluation built on the same steps."""
