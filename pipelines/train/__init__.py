"""Training (Ray Train): LoRA/QLoRA/Train sections, the frozen base, DDP/ZeRO engine, the loop, SFT and DPO."""
