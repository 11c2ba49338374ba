"""One module per supported HF model family: config reading plus the weight table."""
