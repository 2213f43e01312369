"""Training of the small model that headwatch ships: corpus, tokenizer, synthetic tasks, loop, export."""
