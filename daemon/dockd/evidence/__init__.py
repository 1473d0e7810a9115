"""What a session folder in the store holds besides the footage: manifest and sidecars."""
