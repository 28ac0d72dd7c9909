"""Ray jobs, one file per stage (caption, sft, make_preferences, dpo, eval); each wires library pieces together."""
