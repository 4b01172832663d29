"""Trainers that use the loss library: engines/megatron (mile-pretrain) and engines/deepspeed (mile-pretrain-ds).
They depend on mile_megatron.loss, recipes, data and utils (DeepSpeed also on hf), never on each other."""
