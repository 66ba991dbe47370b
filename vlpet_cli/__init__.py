"""vlpet: parameter-efficient tuning of vision-and-language encoder-decoders (VL-PET and baselines)."""

__version__ = "0.1.0"
