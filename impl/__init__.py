"""llama3-golden's own Llama 3 implementation: config, tokenizer, weights, model, generation, assets, CLI."""
