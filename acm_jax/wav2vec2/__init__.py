"""The Wav2Vec2 family: model, Hugging Face import, FLOPs per second of audio, CTC,
speech data (synthesised and Common Voice) and the speech task."""
