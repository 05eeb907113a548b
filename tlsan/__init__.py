"""tlsan"""
