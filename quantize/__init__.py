"""perseus_edge.quantize"""
