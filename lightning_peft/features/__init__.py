"""Features of a frozen backbone: where they are taken (feature point), pooling, the on-disk store and probing."""
