"""Architecture-specific CPU and platform setup."""
