"""The video demo model: a tiny class-conditional STARFlow-V trained on procedural clips."""
