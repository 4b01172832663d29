"""`python -m mile_megatron.engines.deepspeed` = mile-pretrain-ds (what deepspeed / torchrun launch)."""

from .cli import main

if __name__ == "__main__":
    main()
