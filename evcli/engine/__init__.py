"""The one training engine (on Accelerate) that every method plugs into."""
