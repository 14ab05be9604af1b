"""Model-free music evaluation: semitone chroma, key and instrument accuracy, MIDI agreement, a mel+chroma embedder."""
