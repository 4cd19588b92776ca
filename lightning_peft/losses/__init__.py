"""Training losses beside the task loss: knowledge distillation and L2-SP toward the pretrained weights."""
