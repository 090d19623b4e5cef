"""Training adapters from recipes: the model, the data, the loop and what it writes."""
