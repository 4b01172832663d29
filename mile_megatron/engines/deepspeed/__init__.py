"""mile-pretrain-ds: the paper's own engine (Hugging Face LLaMA + DeepSpeed ZeRO) on Megatron's data, with the
same loss and step objective as mile-pretrain. See cli.py."""
