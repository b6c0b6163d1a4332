"""The ptxas and SASS parsers of attnopt.kernels.sass on text captured from Triton 3.9's bundled tools."""

from attnopt.kernels import sass

# ptxas-blackwell -v --warn-on-spills -arch=sm_90a on attnopt's exact forward (D128 bf16, 128x128 tiles)
PTXAS_SERIALIZED = """\
ptxas-blackwell info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in the function 'attnopt_exact_fwd_699c0e86838b' in line 1802
ptxas-blackwell info    : 11 bytes gmem
ptxas-blackwell info    : Compiling entry function 'attnopt_exact_fwd_699c0e86838b' for 'sm_90a'
ptxas-blackwell info    : Function properties for attnopt_exact_fwd_699c0e86838b
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Used 234 registers, used 1 barriers
ptxas-blackwell info    : Compile time = 520.676 ms
"""

# ptxas -v --warn-on-spills -arch=sm_80 on the linear backward (grad) kernel, D64
PTXAS_SPILLS = """\
ptxas warning : Registers are spilled to local memory in function 'attnopt_linear_grad_659f6128a690', 1736 bytes spill stores, 1736 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'attnopt_linear_grad_659f6128a690' for 'sm_80'
ptxas info    : Function properties for attnopt_linear_grad_659f6128a690
    1712 bytes stack frame, 1736 bytes spill stores, 1736 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 1712 bytes cumulative stack size, 568 bytes cmem[0]
ptxas info    : Compile time = 2684.106 ms
"""

# cuobjdump -sass, trimmed from the sigmoid forward for sm_90a: a loop (0x0f80 .. 0x31e0) holding two wgmma
# groups, one of them serialized by its WARPGROUP.DEPBAR inside the loop, and a forward branch before it.
SASS = """\
\tcode for sm_90a
\t\tFunction : attnopt_sigmoid_fwd_662ef05b5416
\t.headerflags\t@"EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0d40*/               @P2 BRA 0x31f0 ;                                                      /* 0x0000002400282947 */
        /*0f80*/                   LDGDEPBAR ;                                                       /* 0x00000000000079af */
        /*1110*/                   WARPGROUP.ARRIVE ;                                                /* 0x00000000000079c5 */
        /*1120*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], RZ, !UPT ;              /* 0x00e000000c1879f0 */
        /*1170*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24 ;                   /* 0x00e000000c1879f0 */
        /*1210*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24, gsb0 ;             /* 0x00e000000c1879f0 */
        /*1270*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;                                   /* 0x00008000000079c5 */
        /*1280*/                   FMUL R3, R24, 0.125 ;                                             /* 0x3e00000018037820 */
        /*2c40*/                   WARPGROUP.ARRIVE ;                                                /* 0x00000000000079c5 */
        /*2c80*/                   HGMMA.64x64x16.F32.BF16 R56, R100, gdesc[UR12].tnspB, R56 ;       /* 0x40e0000c64387df0 */
        /*30a0*/                   HGMMA.64x64x16.F32.BF16 R56, R88, gdesc[UR12].tnspB, R56, gsb0 ;  /* 0x40e0000c58387df0 */
        /*31e0*/              @!P2 BRA 0xf80 ;                                                       /* 0xffffffdc0064a947 */
        /*31f0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;                                   /* 0x00008000000079c5 */
        /*3200*/                   HMMA.16816.F32.BF16 R60, R100.reuse, R96, RZ ;                    /* 0x00000060643c723c */
        /*3210*/                   EXIT ;                                                            /* 0x000000000000794d */
        /*3220*/                   BRA 0x3220;                                                       /* 0xfffffffc00fc7947 */
"""

PTXAS_HELP = """\
--gpu-name <gpu name>                               (-arch)
        Specify name of NVIDIA GPU to generate code for.
        Allowed values for this option:  'compute_100','compute_90a','lto_90a','sm_100',
        'sm_100a','sm_100f','sm_120','sm_50','sm_80','sm_86','sm_90','sm_90a'.
        Default value:  'sm_52'.

--help                                              (-h)
"""


def test_ptxas_registers_and_serialized_wgmma_advisory():
    info = sass.parse_ptxas(PTXAS_SERIALIZED)
    assert (info.registers, info.spill_bytes, info.stack_bytes) == (234, 0, 0)
    assert info.advisories == ("(C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due "
                               "to non wgmma instructions defining accumulator registers of a wgmma between start "
                               "and end of the pipeline stage",)  # fmt: skip
    assert info.serialized_wgmma


def test_ptxas_spills_and_stack():
    info = sass.parse_ptxas(PTXAS_SPILLS)
    assert (info.registers, info.spill_stores, info.spill_loads, info.stack_bytes) == (168, 1736, 1736, 1712)
    assert info.spill_bytes == 1736
    assert info.advisories == ("Registers are spilled to local memory, 1736 bytes spill stores, 1736 bytes spill loads",)
    assert not info.serialized_wgmma


def test_parse_sass_reads_opcodes_without_predicates():
    instructions = sass.parse_sass(SASS)
    assert len(instructions) == 16
    assert (instructions[0].address, instructions[0].opcode) == (0x0D40, "BRA")
    assert instructions[2].opcode == "WARPGROUP.ARRIVE"
    assert instructions[3].opcode == "HGMMA.64x64x16.F32.BF16"


def test_loops_and_interior_loop():
    instructions = sass.parse_sass(SASS)
    found = sass.loops(instructions)
    # the backward branch 0x31e0 -> 0x0f80, and the trailing self-branch after EXIT (no tensor-core op)
    assert [(lp["start"], lp["end"]) for lp in found] == [(0x0F80, 0x31E0), (0x3220, 0x3220)]
    loop = sass.interior_loop(instructions)
    assert (loop["start"], loop["end"], loop["instructions"]) == (0x0F80, 0x31E0, 11)
    assert (loop["hgmma"], loop["hmma"], loop["warpgroup_ops"]) == (5, 0, 3)
    assert loop["warpgroup"] == {"WARPGROUP.ARRIVE": 2, "WARPGROUP.DEPBAR": 1}
    whole = sass.mix(instructions)
    assert (whole["hgmma"], whole["hmma"], whole["utcmma"], whole["warpgroup_ops"]) == (5, 1, 0, 4)
    assert sass.tensor_ops(whole) == 6


def test_blackwell_tcgen05_mma_counts_as_tensor_core_work():
    # cuobjdump -sass of attnopt's exact forward for sm_100a issues UTCHMMA (tcgen05.mma), not HGMMA
    blackwell = sass.parse_sass(SASS.replace("HGMMA.64x64x16.F32.BF16", "UTCHMMA").replace("HMMA.16816.F32.BF16",
                                                                                        "UTCBAR"))  # fmt: skip
    counts = sass.mix(blackwell)
    assert (counts["hgmma"], counts["hmma"], counts["utcmma"]) == (0, 0, 5)
    assert sass.interior_loop(blackwell)["utcmma"] == 5


def test_interior_loop_prefers_the_innermost_loop_with_most_tensor_core_ops():
    outer_inner = SASS.replace("/*3220*/                   BRA 0x3220;", "/*3220*/                   BRA 0xd40;")
    instructions = sass.parse_sass(outer_inner)
    loops = {(lp["start"], lp["end"]): lp["innermost"] for lp in sass.loops(instructions)}
    assert loops == {(0x0F80, 0x31E0): True, (0x0D40, 0x3220): False}
    assert sass.interior_loop(instructions)["start"] == 0x0F80
    assert sass.interior_loop(sass.parse_sass(SASS.replace("HGMMA", "FFMA").replace("HMMA", "FFMA"))) is None


def test_gpu_names_from_ptxas_help():
    assert sass.parse_gpu_names(PTXAS_HELP) == ["sm_50", "sm_80", "sm_86", "sm_90", "sm_90a", "sm_100", "sm_100a",
                                                "sm_100f", "sm_120"]  # fmt: skip
    assert sass.parse_gpu_names("no such section") == []
