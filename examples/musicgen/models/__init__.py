"""Models: the mini EnCodec, the caption text encoder, MusicGen builders and loaders, tiny random models."""
