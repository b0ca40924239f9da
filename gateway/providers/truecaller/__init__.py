"""Truecaller mobile web: the deep link, the server callback, the profile fetch from a checked host."""
