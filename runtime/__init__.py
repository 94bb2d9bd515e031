"""perseus_edge.runtime"""
