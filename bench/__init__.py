"""perseus_edge.bench"""
