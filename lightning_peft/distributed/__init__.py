"""Multi-process training: averaging gradients that DDP/FSDP does not reduce, and FSDP wrapping of a frozen base."""
