// nnforge arm runner: runs a TVM Relax library (model.so from export_library) with the Relax VM.
//
//   runner model.so out_dir in0.npy in1.npy ...
//
// Inputs are .npy files (little-endian, C order; float32/float64/float16/int64/int32/int8/uint8/
// bool). Each output is written to out_dir/out<i>.npy (tuples are flattened in order).
// If tvm.json (written by nnforge's TVM backend) lies beside model.so, it names the function and
// the weights: those are read from weights.safetensors beside it, passed through
// <func>_transform_params when the library has one, and appended to the inputs.
// Needs only libtvm_runtime.so and libtvm_ffi.so (link with --no-as-needed). Exit codes: 0 ok,
// 1 error (message on stderr), 2 usage.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

static void fail(const std::string& msg) { throw std::runtime_error(msg); }

static std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot open " + path);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

static bool file_exists(const std::string& path) { return std::ifstream(path).good(); }

// ---- tensors: 64-byte aligned host memory -------------------------------------------------
struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t n = ffi::GetDataSize(*t);
    if (posix_memalign(&t->data, 64, n ? n : 1) != 0) fail("out of memory");
  }
  void FreeData(DLTensor* t) { free(t->data); }
};

static ffi::Tensor make_tensor(const std::vector<int64_t>& shape, DLDataType dt, const char* data) {
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::Shape(shape), dt, DLDevice{kDLCPU, 0});
  std::memcpy(t.data_ptr(), data, ffi::GetDataSize(t));
  return t;
}

// ---- dtypes: npy descr and safetensors names ----------------------------------------------
struct DType { const char* npy; const char* st; DLDataType dl; };
static const DType kDTypes[] = {
    {"<f4", "F32", {kDLFloat, 32, 1}}, {"<f8", "F64", {kDLFloat, 64, 1}},
    {"<f2", "F16", {kDLFloat, 16, 1}}, {"<i8", "I64", {kDLInt, 64, 1}},
    {"<i4", "I32", {kDLInt, 32, 1}},   {"<i2", "I16", {kDLInt, 16, 1}},
    {"|i1", "I8", {kDLInt, 8, 1}},     {"|u1", "U8", {kDLUInt, 8, 1}},
    {"|b1", "BOOL", {kDLBool, 8, 1}},  {nullptr, "BF16", {kDLBfloat, 16, 1}},  // bf16: weights only
};

static DLDataType dtype_from(const std::string& name, bool npy) {
  for (const DType& d : kDTypes) {
    const char* n = npy ? d.npy : d.st;
    if (n && name == n) return d.dl;
  }
  fail("unsupported dtype " + name);
  return {};
}

static const char* npy_descr(DLDataType dl) {
  for (const DType& d : kDTypes)
    if (d.npy && d.dl.code == dl.code && d.dl.bits == dl.bits && dl.lanes == 1) return d.npy;
  fail("cannot write output of dtype code " + std::to_string(dl.code) + " bits " + std::to_string(dl.bits));
  return nullptr;
}

// ---- npy ------------------------------------------------------------------------------------
static std::string dict_field(const std::string& h, const std::string& key) {
  size_t k = h.find("'" + key + "'");
  if (k == std::string::npos) fail("npy header lacks " + key);
  size_t c = h.find(':', k);
  size_t b = h.find_first_not_of(' ', c + 1);
  if (h[b] == '\'') return h.substr(b + 1, h.find('\'', b + 1) - b - 1);
  if (h[b] == '(') return h.substr(b + 1, h.find(')', b) - b - 1);
  return h.substr(b, h.find_first_of(",}", b) - b);
}

static ffi::Tensor read_npy(const std::string& path) {
  std::string s = read_file(path);
  if (s.size() < 10 || s.compare(0, 6, "\x93NUMPY") != 0) fail(path + " is not a .npy file");
  size_t hlen, off;
  if (s[6] == 1) { hlen = (uint8_t)s[8] | ((uint8_t)s[9] << 8); off = 10; }
  else { hlen = 0; for (int i = 0; i < 4; ++i) hlen |= size_t((uint8_t)s[8 + i]) << (8 * i); off = 12; }
  if (off + hlen > s.size()) fail(path + ": truncated header");
  std::string h = s.substr(off, hlen);
  if (dict_field(h, "fortran_order") != "False") fail(path + ": Fortran-order arrays are not supported");
  DLDataType dt = dtype_from(dict_field(h, "descr"), true);
  std::vector<int64_t> shape;
  std::stringstream dims(dict_field(h, "shape"));
  for (std::string tok; std::getline(dims, tok, ',');)
    if (tok.find_first_of("0123456789") != std::string::npos) shape.push_back(std::stoll(tok));
  size_t numel = 1;
  for (int64_t d : shape) numel *= size_t(d);
  if (s.size() - off - hlen < ffi::GetDataSize(numel, dt)) fail(path + ": truncated data");
  return make_tensor(shape, dt, s.data() + off + hlen);
}

static void write_npy(const std::string& path, const ffi::Tensor& t) {
  if (t.device().device_type != kDLCPU) fail("output is not on the CPU");
  if (!t.IsContiguous()) fail("output is not contiguous");
  std::string shape;
  int nd = t.ndim();
  for (int i = 0; i < nd; ++i) shape += std::to_string(t.size(i)) + (nd == 1 ? "," : i + 1 < nd ? ", " : "");
  std::string h = std::string("{'descr': '") + npy_descr(t.dtype()) + "', 'fortran_order': False, 'shape': (" + shape + "), }";
  h.append(63 - (10 + h.size()) % 64, ' ');
  h += '\n';
  std::ofstream f(path, std::ios::binary);
  uint16_t hl = uint16_t(h.size());
  f.write("\x93NUMPY\x01\x00", 8);
  f.put(char(hl & 0xff)).put(char(hl >> 8));
  f << h;
  f.write(static_cast<const char*>(t.data_ptr()) + t.byte_offset(), ffi::GetDataSize(t));
  if (!f) fail("cannot write " + path);
}

// ---- a minimal JSON reader (tvm.json and the safetensors header) --------------------------
struct Json {
  enum Kind { Null, Bool, Num, Str, Arr, Obj } kind = Null;
  double num = 0;
  std::string str;
  std::vector<Json> arr;
  std::map<std::string, Json> obj;
  const Json& at(const std::string& k) const {
    auto it = obj.find(k);
    if (kind != Obj || it == obj.end()) fail("JSON field '" + k + "' is missing");
    return it->second;
  }
  bool has(const std::string& k) const { return kind == Obj && obj.count(k); }
};

struct JsonParser {
  const std::string& s;
  size_t i = 0;
  void ws() { while (i < s.size() && std::strchr(" \t\r\n", s[i])) ++i; }
  char peek() { ws(); if (i >= s.size()) fail("JSON ends early"); return s[i]; }
  void expect(char c) { if (peek() != c) fail(std::string("JSON: expected '") + c + "'"); ++i; }
  std::string string() {
    expect('"');
    std::string out;
    while (i < s.size() && s[i] != '"') {
      char c = s[i++];
      if (c == '\\') {
        char e = s[i++];
        if (e == 'u') { out += '?'; i += 4; }  // names here are ASCII; keep it simple
        else out += (e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e == 'b' ? '\b' : e == 'f' ? '\f' : e);
      } else {
        out += c;
      }
    }
    ++i;
    return out;
  }
  Json value() {
    Json j;
    char c = peek();
    if (c == '{') {
      j.kind = Json::Obj; ++i;
      if (peek() == '}') { ++i; return j; }
      for (;;) { std::string k = string(); expect(':'); j.obj[k] = value(); if (peek() == ',') { ++i; continue; } expect('}'); return j; }
    }
    if (c == '[') {
      j.kind = Json::Arr; ++i;
      if (peek() == ']') { ++i; return j; }
      for (;;) { j.arr.push_back(value()); if (peek() == ',') { ++i; continue; } expect(']'); return j; }
    }
    if (c == '"') { j.kind = Json::Str; j.str = string(); return j; }
    for (const char* w : {"true", "false", "null"})
      if (s.compare(i, std::strlen(w), w) == 0) {
        i += std::strlen(w);
        j.kind = w[0] == 'n' ? Json::Null : Json::Bool;
        j.num = w[0] == 't';
        return j;
      }
    size_t end = s.find_first_of(",]} \t\r\n", i);
    j.kind = Json::Num;
    j.num = std::stod(s.substr(i, end - i));
    i = end;
    return j;
  }
};

static Json parse_json(const std::string& text) { JsonParser p{text}; return p.value(); }

// ---- safetensors: name -> tensor ------------------------------------------------------------
static std::map<std::string, ffi::Tensor> read_safetensors(const std::string& path) {
  std::string s = read_file(path);
  if (s.size() < 8) fail(path + " is not a safetensors file");
  uint64_t n = 0;
  for (int k = 0; k < 8; ++k) n |= uint64_t((uint8_t)s[k]) << (8 * k);
  if (8 + n > s.size()) fail(path + ": truncated header");
  Json head = parse_json(s.substr(8, n));
  std::map<std::string, ffi::Tensor> out;
  for (const auto& kv : head.obj) {
    if (kv.first == "__metadata__") continue;
    const Json& e = kv.second;
    std::vector<int64_t> shape;
    for (const Json& d : e.at("shape").arr) shape.push_back(int64_t(d.num));
    size_t begin = size_t(e.at("data_offsets").arr.at(0).num), end = size_t(e.at("data_offsets").arr.at(1).num);
    DLDataType dt = dtype_from(e.at("dtype").str, false);
    size_t numel = 1;
    for (int64_t d : shape) numel *= size_t(d);
    if (end < begin || 8 + n + end > s.size() || end - begin != ffi::GetDataSize(numel, dt))
      fail(path + ": bad data offsets for " + kv.first);
    out.emplace(kv.first, make_tensor(shape, dt, s.data() + 8 + n + begin));
  }
  return out;
}

// ---- running --------------------------------------------------------------------------------
static ffi::Any call(const ffi::Function& f, const std::vector<ffi::Any>& args) {
  std::vector<ffi::AnyView> views(args.begin(), args.end());
  ffi::Any rv;
  f.CallPacked(views.data(), int32_t(views.size()), &rv);
  return rv;
}

static void flatten(const ffi::Any& v, std::vector<ffi::Tensor>* out) {
  if (auto t = v.as<ffi::Tensor>()) { out->push_back(*t); return; }
  if (auto a = v.as<ffi::Array<ffi::Any>>()) { for (const ffi::Any& x : *a) flatten(x, out); return; }
  fail("model returned a value that is neither a tensor nor a tuple (type " + v.GetTypeKey() + ")");
}

static ffi::Function vm_func(ffi::Module& vm, const std::string& name) {
  ffi::Optional<ffi::Function> f = vm->GetFunction(name);
  if (!f.has_value()) fail("the library has no function '" + name + "'");
  return *f;
}

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s model.so out_dir [in0.npy in1.npy ...]\n", argv[0]);
    return 2;
  }
  try {
    std::string lib = argv[1], out_dir = argv[2];
    std::string dir = lib.find('/') == std::string::npos ? "." : lib.substr(0, lib.rfind('/'));
    std::string func = "main";
    std::vector<ffi::Any> args;
    for (int k = 3; k < argc; ++k) args.push_back(read_npy(argv[k]));

    ffi::Module exe = ffi::Module::LoadFromFile(lib);
    ffi::Module vm = call(vm_func(exe, "vm_load_executable"), {}).cast<ffi::Module>();
    call(vm_func(vm, "vm_initialization"), {int64_t(kDLCPU), int64_t(0), int64_t(2)});  // 2: pooled allocator

    if (file_exists(dir + "/tvm.json")) {
      Json meta = parse_json(read_file(dir + "/tvm.json"));
      func = meta.at("func").str;
      if (meta.has("inputs") && meta.at("inputs").arr.size() != args.size()) {
        std::string names;
        for (const Json& nm : meta.at("inputs").arr) names += (names.empty() ? "" : ", ") + nm.str;
        fail("the model takes " + std::to_string(meta.at("inputs").arr.size()) + " input(s) (" + names + "), got " +
             std::to_string(args.size()));
      }
      const std::vector<Json>& names = meta.at("params").arr;
      if (!names.empty()) {
        std::map<std::string, ffi::Tensor> weights = read_safetensors(dir + "/weights.safetensors");
        ffi::Array<ffi::Any> params;
        for (const Json& nm : names) {
          auto it = weights.find(nm.str);
          if (it == weights.end()) fail("weights.safetensors lacks weight '" + nm.str + "'");
          params.push_back(it->second);
        }
        if (meta.has("transform_params") && meta.at("transform_params").num != 0)
          params = call(vm_func(vm, func + "_transform_params"), {params}).cast<ffi::Array<ffi::Any>>();
        for (const ffi::Any& p : params) args.push_back(p);
      }
    }
    std::vector<ffi::Tensor> outs;
    flatten(call(vm_func(vm, func), args), &outs);
    for (size_t k = 0; k < outs.size(); ++k) write_npy(out_dir + "/out" + std::to_string(k) + ".npy", outs[k]);
    std::printf("%zu output(s) written to %s\n", outs.size(), out_dir.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nnforge arm runner: %s\n", e.what());
    return 1;
  }
}
