"""Chat data: sources, synthetic corpora and tokenizers."""
