"""Speech recognition pieces shared by the Wav2Vec2 task: CTC vocabulary, loss,
decoding, error rates and FLOP counts per second of audio."""
