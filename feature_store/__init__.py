"""feature_store"""
