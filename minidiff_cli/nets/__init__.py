"""The networks diffusion trains: the U-Net (time and condition embeddings, attention).

    unet.py  UNetConfig (checked bounds, activation estimate) and UNet
    lora.py  low-rank adapters on its Linear and Conv2d layers: add, train, merge

May import: errors only.
"""
