// apar::TreePagedAttention version 1 as a C++ IPluginV3 (IPluginV3OneCore/BuildV2/Runtime).
//
// The contract is plugins/README.md and apar_rt/export/op.py: fields = the ONNX node's numeric
// attributes (num_heads, num_kv_heads, head_size, block_size, scale); 9 inputs q k v k_cache v_cache
// block_tables context_lens query_start mask; one output with q's shape and type.
//
// enqueue launches the same Triton kernel as the torch backend (apar_rt/kernels/tree_attention.py,
// `_tree_attention_kernel`), compiled ahead of time to PTX by `python -m apar_rt.trt.plugin_kernels`
// (apar_rt/kernels/aot.py). The PTX files live in a folder: $APAR_TRT_KERNEL_DIR, else
// `<folder of this library>/kernels`. They are loaded with the CUDA driver API, which is opened
// with dlopen on the first enqueue, so the library loads (and a plan builds) on a machine without a
// GPU or driver. The plugin always runs the kernel with one context split (no scratch).
//
// Compiled against TensorRT's public headers (fetched at build time, never committed); exports
// getCreators and setLoggerFinder, which IPluginRegistry::loadLibrary looks up.

#include "NvInferRuntime.h"

#include <cuda.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

constexpr char const* kNAME = "TreePagedAttention";
constexpr char const* kVERSION = "1";
constexpr char const* kNAMESPACE = "apar";
constexpr int32_t kNB_INPUTS = 9;  // q k v k_cache v_cache block_tables context_lens query_start mask
constexpr float kLOG2E = 1.4426950408889634f;

ILoggerFinder* gLoggerFinder = nullptr;

void logError(std::string const& msg)
{
    ILogger* logger = gLoggerFinder ? gLoggerFinder->findLogger() : nullptr;
    std::string full = std::string("apar::TreePagedAttention: ") + msg;
    if (logger)
        logger->log(ILogger::Severity::kERROR, full.c_str());
    else
        std::fprintf(stderr, "%s\n", full.c_str());
}

struct Fields
{
    int32_t numHeads{0};
    int32_t numKvHeads{0};
    int32_t headSize{0};
    int32_t blockSize{0};
    float scale{0.F};
};

// ---- the kernel images: PTX written by apar_rt/trt/plugin_kernels.py ------------------------------

using ModuleLoadData = CUresult (*)(CUmodule*, void const*);
using ModuleGetFunction = CUresult (*)(CUfunction*, CUmodule, char const*);
using FuncSetAttribute = CUresult (*)(CUfunction, CUfunction_attribute, int);
using LaunchKernel = CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
    CUstream, void**, void**);
using CtxGetCurrent = CUresult (*)(CUcontext*);

struct Driver
{
    ModuleLoadData moduleLoadData{};
    ModuleGetFunction moduleGetFunction{};
    FuncSetAttribute funcSetAttribute{};
    LaunchKernel launchKernel{};
    CtxGetCurrent ctxGetCurrent{};
    bool ok{false};
};

Driver const& driver()
{
    static Driver d = [] {
        Driver r;
        void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (!h)
            return r;
        r.moduleLoadData = reinterpret_cast<ModuleLoadData>(dlsym(h, "cuModuleLoadData"));
        r.moduleGetFunction = reinterpret_cast<ModuleGetFunction>(dlsym(h, "cuModuleGetFunction"));
        r.funcSetAttribute = reinterpret_cast<FuncSetAttribute>(dlsym(h, "cuFuncSetAttribute"));
        r.launchKernel = reinterpret_cast<LaunchKernel>(dlsym(h, "cuLaunchKernel"));
        r.ctxGetCurrent = reinterpret_cast<CtxGetCurrent>(dlsym(h, "cuCtxGetCurrent"));
        r.ok = r.moduleLoadData && r.moduleGetFunction && r.funcSetAttribute && r.launchKernel && r.ctxGetCurrent;
        return r;
    }();
    return d;
}

std::string kernelDir()
{
    if (char const* env = std::getenv("APAR_TRT_KERNEL_DIR"))
        return env;
    Dl_info info{};
    if (dladdr(reinterpret_cast<void const*>(&kernelDir), &info) && info.dli_fname)
    {
        std::string lib(info.dli_fname);
        auto slash = lib.rfind('/');
        return (slash == std::string::npos ? std::string(".") : lib.substr(0, slash)) + "/kernels";
    }
    return "kernels";
}

std::string dtypeName(DataType t)
{
    switch (t)
    {
    case DataType::kFLOAT: return "float32";
    case DataType::kHALF: return "float16";
    case DataType::kBF16: return "bfloat16";
    default: return "unsupported";
    }
}

// One compiled variant: `// apar-kernel: block_q=.. block_m=.. num_warps=.. shared=..` is the PTX's first line.
struct Kernel
{
    CUfunction fn{};
    int blockQ{0};
    int numWarps{0};
    int shared{0};
};

// File name of a variant; plugin_kernels.py writes the same names.
std::string kernelFile(Fields const& f, DataType t, bool decode)
{
    std::ostringstream s;
    s << kernelDir() << "/tree_attention_" << dtypeName(t) << "_h" << f.numHeads << "_kv" << f.numKvHeads << "_d"
      << f.headSize << "_bs" << f.blockSize << (decode ? "_decode" : "_prefill") << ".ptx";
    return s.str();
}

bool loadKernel(std::string const& path, Kernel& k)
{
    Driver const& d = driver();
    if (!d.ok)
    {
        logError("cannot open the CUDA driver (libcuda.so.1)");
        return false;
    }
    std::ifstream in(path, std::ios::binary);
    if (!in)
    {
        logError("kernel image " + path + " does not exist; write it with python -m apar_rt.trt.plugin_kernels");
        return false;
    }
    std::string ptx((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (std::sscanf(ptx.c_str(), "// apar-kernel: block_q=%d block_m=%*d num_warps=%d shared=%d", &k.blockQ,
            &k.numWarps, &k.shared)
        != 3)
    {
        logError("kernel image " + path + " has no '// apar-kernel:' header line");
        return false;
    }
    CUmodule mod{};
    if (d.moduleLoadData(&mod, ptx.c_str()) != CUDA_SUCCESS
        || d.moduleGetFunction(&k.fn, mod, "_tree_attention_kernel") != CUDA_SUCCESS)
    {
        logError("the CUDA driver refused kernel image " + path);
        return false;
    }
    if (k.shared > 48 * 1024
        && d.funcSetAttribute(k.fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, k.shared) != CUDA_SUCCESS)
    {
        logError("cannot grant " + std::to_string(k.shared) + " bytes of shared memory to " + path);
        return false;
    }
    return true;
}

// Kernels are per CUDA context and file.
Kernel const* getKernel(std::string const& path)
{
    static std::mutex mu;
    static std::map<std::pair<CUcontext, std::string>, Kernel> cache;
    CUcontext ctx{};
    if (!driver().ok || driver().ctxGetCurrent(&ctx) != CUDA_SUCCESS)
    {
        logError("no CUDA driver or context");
        return nullptr;
    }
    std::lock_guard<std::mutex> lock(mu);
    auto key = std::make_pair(ctx, path);
    auto it = cache.find(key);
    if (it != cache.end())
        return &it->second;
    Kernel k;
    if (!loadKernel(path, k))
        return nullptr;
    return &cache.emplace(key, k).first->second;
}

// ---- the plugin ------------------------------------------------------------------------------------

class TreePagedAttentionPlugin : public IPluginV3,
                                 public IPluginV3OneCore,
                                 public IPluginV3OneBuildV2,
                                 public IPluginV3OneRuntime
{
public:
    explicit TreePagedAttentionPlugin(Fields const& f)
        : mF(f)
    {
        mSerial = {PluginField{"num_heads", &mF.numHeads, PluginFieldType::kINT32, 1},
            PluginField{"num_kv_heads", &mF.numKvHeads, PluginFieldType::kINT32, 1},
            PluginField{"head_size", &mF.headSize, PluginFieldType::kINT32, 1},
            PluginField{"block_size", &mF.blockSize, PluginFieldType::kINT32, 1},
            PluginField{"scale", &mF.scale, PluginFieldType::kFLOAT32, 1}};
        mCollection.nbFields = static_cast<int32_t>(mSerial.size());
        mCollection.fields = mSerial.data();
    }

    // IPluginV3
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuildV2*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }
    IPluginV3* clone() noexcept override
    {
        return new (std::nothrow) TreePagedAttentionPlugin(mF);
    }

    // IPluginV3OneCore
    AsciiChar const* getPluginName() const noexcept override { return kNAME; }
    AsciiChar const* getPluginVersion() const noexcept override { return kVERSION; }
    AsciiChar const* getPluginNamespace() const noexcept override { return kNAMESPACE; }

    // IPluginV3OneBuild
    int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t nbInputs, DynamicPluginTensorDesc const*,
        int32_t nbOutputs) noexcept override
    {
        return nbInputs == kNB_INPUTS && nbOutputs == 1 ? 0 : -1;
    }
    int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
        int32_t nbInputs) const noexcept override
    {
        if (nbOutputs != 1 || nbInputs != kNB_INPUTS)
            return -1;
        outputTypes[0] = inputTypes[0];
        return 0;
    }
    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
        int32_t nbOutputs, IExprBuilder&) noexcept override
    {
        if (nbOutputs != 1 || nbInputs != kNB_INPUTS)
            return -1;
        outputs[0] = inputs[0];
        return 0;
    }
    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t) noexcept override
    {
        PluginTensorDesc const& d = inOut[pos].desc;
        if (d.format != TensorFormat::kLINEAR)
            return false;
        if (pos == 0)
            return d.type == DataType::kFLOAT || d.type == DataType::kHALF || d.type == DataType::kBF16;
        if (pos >= 5 && pos <= 7)
            return d.type == DataType::kINT32;  // block_tables, context_lens, query_start
        if (pos == 8 && pos < nbInputs)
            return d.type == DataType::kBOOL;  // mask
        return d.type == inOut[0].desc.type;   // k, v, pools, out: like q
    }
    int32_t getNbOutputs() const noexcept override { return 1; }
    char const* getTimingCacheID() noexcept override { return nullptr; }

    // IPluginV3OneRuntime
    int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept override
    {
        return 0;
    }
    IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }
    PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &mCollection; }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc, void const* const* inputs,
        void* const* outputs, void*, cudaStream_t stream) noexcept override
    {
        Dims const& q = inputDesc[0].dims;           // [T, Hq, D]
        Dims const& bt = inputDesc[5].dims;          // [B, max_blocks]
        Dims const& mask = inputDesc[8].dims;        // [T, max_q]
        int32_t const T = static_cast<int32_t>(q.d[0]);
        int32_t const B = static_cast<int32_t>(bt.d[0]);
        if (T == 0)
            return 0;
        bool const decode = T <= 2 * (B > 0 ? B : 1);   // as plan_launch picks the tile
        Kernel const* k = getKernel(kernelFile(mF, inputDesc[0].type, decode));
        if (!k)
            return -1;
        int32_t const hq = mF.numHeads, hkv = mF.numKvHeads, dd = mF.headSize;
        // Element strides of contiguous tensors (tensor_strides in tree_attention.py).
        int32_t st[13] = {hq * dd, dd, hkv * dd, dd, hkv * dd, dd, mF.blockSize * hkv * dd, hkv * dd, dd,
            static_cast<int32_t>(bt.d[1]), static_cast<int32_t>(mask.d[1]), hq * dd, dd};
        void const* ptr[12] = {inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], inputs[5], inputs[6], inputs[7],
            inputs[8], outputs[0], outputs[0], outputs[0]};   // part_acc/part_ml unused with one split
        float scaleLog2 = mF.scale * kLOG2E;
        int32_t numSeqs = B;
        int32_t maxQ = static_cast<int32_t>(mask.d[1]);
        void* scratch[2] = {nullptr, nullptr};               // Triton 3.9's global and profile scratch
        void* args[30];
        for (int i = 0; i < 12; ++i)
            args[i] = const_cast<void**>(&ptr[i]);
        args[12] = &scaleLog2;
        args[13] = &numSeqs;
        args[14] = &maxQ;
        for (int i = 0; i < 13; ++i)
            args[15 + i] = &st[i];
        args[28] = &scratch[0];
        args[29] = &scratch[1];
        unsigned const gridX = static_cast<unsigned>(T / k->blockQ + B);
        CUresult r = driver().launchKernel(k->fn, gridX, static_cast<unsigned>(hkv), 1,
            static_cast<unsigned>(32 * k->numWarps), 1, 1, static_cast<unsigned>(k->shared),
            reinterpret_cast<CUstream>(stream), args, nullptr);
        if (r != CUDA_SUCCESS)
        {
            logError("cuLaunchKernel failed with CUresult " + std::to_string(static_cast<int>(r)));
            return -1;
        }
        return 0;
    }

private:
    Fields mF;
    std::vector<PluginField> mSerial;
    PluginFieldCollection mCollection{};
};

// ---- the creator -----------------------------------------------------------------------------------

bool readField(PluginField const& f, double& out)
{
    if (f.data == nullptr || f.length < 1)
        return false;
    switch (f.type)
    {
    case PluginFieldType::kINT32: out = *static_cast<int32_t const*>(f.data); return true;
    case PluginFieldType::kINT64: out = static_cast<double>(*static_cast<int64_t const*>(f.data)); return true;
    case PluginFieldType::kFLOAT32: out = *static_cast<float const*>(f.data); return true;
    case PluginFieldType::kFLOAT64: out = *static_cast<double const*>(f.data); return true;
    default: return false;
    }
}

class TreePagedAttentionCreator : public IPluginCreatorV3One
{
public:
    TreePagedAttentionCreator()
    {
        mFields = {PluginField{"num_heads", nullptr, PluginFieldType::kINT32, 1},
            PluginField{"num_kv_heads", nullptr, PluginFieldType::kINT32, 1},
            PluginField{"head_size", nullptr, PluginFieldType::kINT32, 1},
            PluginField{"block_size", nullptr, PluginFieldType::kINT32, 1},
            PluginField{"scale", nullptr, PluginFieldType::kFLOAT32, 1}};
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
    }

    IPluginV3* createPlugin(AsciiChar const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override
    {
        Fields f;
        int seen = 0;
        for (int32_t i = 0; fc && i < fc->nbFields; ++i)
        {
            PluginField const& p = fc->fields[i];
            double v = 0;
            if (p.name == nullptr || !readField(p, v))
                continue;
            std::string n(p.name);
            if (n == "num_heads") { f.numHeads = static_cast<int32_t>(v); seen |= 1; }
            else if (n == "num_kv_heads") { f.numKvHeads = static_cast<int32_t>(v); seen |= 2; }
            else if (n == "head_size") { f.headSize = static_cast<int32_t>(v); seen |= 4; }
            else if (n == "block_size") { f.blockSize = static_cast<int32_t>(v); seen |= 8; }
            else if (n == "scale") { f.scale = static_cast<float>(v); seen |= 16; }
        }
        if (seen != 31)
        {
            logError("missing fields: needs num_heads, num_kv_heads, head_size, block_size and scale");
            return nullptr;
        }
        if (f.numKvHeads <= 0 || f.numHeads % f.numKvHeads != 0)
        {
            logError("num_heads " + std::to_string(f.numHeads) + " is not a multiple of num_kv_heads "
                + std::to_string(f.numKvHeads));
            return nullptr;
        }
        return new (std::nothrow) TreePagedAttentionPlugin(f);
    }
    PluginFieldCollection const* getFieldNames() noexcept override { return &mCollection; }
    AsciiChar const* getPluginName() const noexcept override { return kNAME; }
    AsciiChar const* getPluginVersion() const noexcept override { return kVERSION; }
    AsciiChar const* getPluginNamespace() const noexcept override { return kNAMESPACE; }

private:
    std::vector<PluginField> mFields;
    PluginFieldCollection mCollection{};
};

} // namespace

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder* finder)
{
    gLoggerFinder = finder;
}

extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static TreePagedAttentionCreator creator;
    static IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}
