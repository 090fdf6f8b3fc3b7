"""Packing data sets into shards and streaming them back."""
