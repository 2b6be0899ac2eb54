"""`tunelab plan`: decide before training. `advise` measures prompting, retrieval and a short fine-tuning probe on
the user's eval set; `memory` estimates (and with --measure, measures) peak training memory; `cost` weighs the
training cost against per-call savings."""
