"""Veriph.One: create the provider session, send the user there, pull the result when they come back."""
