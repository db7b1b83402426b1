"""Graph passes: capture, find_blocks, streams, insert_routes."""
