"""Fixtures that start real servers (redis-server, BentoML) on free local ports."""
