"""The normlab lab: experiments that test the claims made for batch normalization."""
