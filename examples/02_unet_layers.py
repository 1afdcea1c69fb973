"""Parts 2 and 4 of the series (layers, U-Net): the layers of a residual block, then a whole U-Net.

A U-Net predicts the noise in x_t, so its output has exactly the shape of its input. On the
way it halves the picture level by level (more channels, smaller maps), and doubles it back,
concatenating the matching feature maps from the way down (the "skips"). A forward hook on
every block prints the shape it hands on; the end is the parameter count, counted two ways.

    python examples/02_unet_layers.py
"""

import torch

from minidiff_cli.nets.unet import ResBlock, UNet, UNetConfig

torch.manual_seed(0)

# Part 2: one residual block, the unit the U-Net is built from. Its layers, in data-flow order:
block = ResBlock(cin=32, cout=64, emb_dim=128, groups=8, dropout=0.0)
for name, layer in block.named_children():
    params = sum(p.numel() for p in layer.parameters())
    print(f"  ResBlock.{name:<8} {type(layer).__name__:<10} {params:>6} parameters")
x, emb = torch.randn(2, 32, 16, 16), torch.randn(2, 128)  # a batch of 2 feature maps, and their time embedding
print(f"ResBlock: {list(x.shape)} -> {list(block(x, emb).shape)}  (same H, W; 32 -> 64 channels)\n")

# Part 4: a U-Net like the shipped model's, with random weights. Three levels: 32, 16 and 8 pixels.
config = UNetConfig(image_size=32, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                    attention_resolutions=(8,), head_dim=32)
unet = UNet(config).eval()


def show(name):
    def hook(module, inputs, output):
        print(f"  {name:<22} {type(module).__name__:<10} {str(list(inputs[0].shape)):>16} -> {list(output.shape)}")
    return hook


# Hook the blocks that change what flows: residual blocks, attention, down- and upsampling.
# On the way up, a block's input has more channels than the last output: that is the skip, concatenated.
kinds = ("ResBlock", "Attention", "Downsample", "Upsample")
for name, module in unet.named_modules():
    if type(module).__name__ in kinds or name in ("conv_in", "conv_out"):
        module.register_forward_hook(show(name))

x = torch.randn(1, 3, 32, 32)  # x_t: one noisy 32x32 RGB image
t = torch.tensor([500])  # its timestep
print(f"U-Net input x_t {list(x.shape)}, t {list(t.shape)}")
with torch.no_grad():
    eps = unet(x, t)
print(f"U-Net output (the predicted noise) {list(eps.shape)}: the input's shape, as it must be")

# Parameters: counted on the built network, and from the config by formula (no weights needed).
counted = sum(p.numel() for p in unet.parameters())
print(f"parameters: {counted:,} counted, {config.num_parameters():,} from the config")
