"""`python -m mile_megatron.engines.megatron` = mile-pretrain (what torchrun launches)."""

from .cli import main

if __name__ == "__main__":
    main()
