"""perseus_edge.export"""
