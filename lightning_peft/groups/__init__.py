"""How a model is seen: backbone and head, ordered layer groups, name patterns, freezing and layer-wise rates."""
